"""The pass manager orders by contract, checks requires/provides, and names failures."""
from __future__ import annotations

import pytest

import planc
from planc.errors import PassError
from planc.pass_manager import Pass, PassManager, function_pass, order_passes
from planc.program import Program
from planc.spec import BaseModelRef, Spec


def _program() -> Program:
    return Program(spec=Spec(base=BaseModelRef(path="x")), models={})


def make(name, requires=(), provides=(), after=(), before=(), fail=None):
    @function_pass(name, requires=requires, provides=provides, after=after, before=before)
    def p(program, ctx):
        if fail:
            raise fail
        for a in provides:
            program.extras[a] = name
        return True
    return p


def test_orders_by_requires_and_provides_keeping_given_order_otherwise():
    passes = [make("c", requires=("b",), provides=("c",)), make("x"), make("a", provides=("a",)),
              make("b", requires=("a",), provides=("b",))]
    assert [p.name for p in order_passes(passes)] == ["x", "a", "b", "c"]


def test_after_and_before_constraints():
    passes = [make("late", after=("mid",)), make("mid"), make("early", before=("mid",))]
    assert [p.name for p in order_passes(passes)] == ["early", "mid", "late"]


def test_default_pipeline_accepts_a_user_pass_anywhere_in_the_list():
    custom = make("audit", requires=("zoo",), provides=("audit",))
    order = [p.name for p in order_passes([custom] + planc.default_pipeline())]
    assert order == ["trace", "partition", "fingerprint", "dedupe", "audit"]


@pytest.mark.parametrize("passes, message", [
    ([make("a", after=("b",)), make("b", after=("a",))], "cycle"),
    ([make("a", after=("nope",))], "must run after 'nope', which is not in the pipeline"),
    ([make("a", requires=("zoo",))], "requires 'zoo', which no pass in the pipeline provides"),
    ([make("a"), make("a")], "more than one pass named a"),
])
def test_bad_pipelines_are_refused(passes, message):
    with pytest.raises(PassError, match=message):
        order_passes(passes)


def test_failure_names_the_pass_and_those_before_it():
    pm = PassManager([make("one", provides=("x",)), make("two", requires=("x",), fail=ValueError("bad shape")),
                      make("three", requires=("x",))])
    with pytest.raises(PassError) as info:
        pm.run(_program())
    assert str(info.value) == "pass 'two' failed: ValueError: bad shape (after: one)"


def test_a_pass_that_does_not_provide_what_it_promised_is_caught():
    class Liar(Pass):
        name = "liar"
        provides = ("thing",)

        def run(self, program, ctx):
            return False

    with pytest.raises(PassError, match="pass 'liar' did not provide thing"):
        PassManager([Liar()]).run(_program())


def test_records_and_instruments():
    seen = []

    class Spy:
        def before_pass(self, p, program):
            seen.append(("before", p.name))

        def after_pass(self, p, program, record):
            seen.append(("after", record.name, record.changed))

    program = PassManager([make("a", provides=("a",))]).run(_program(), planc.PassContext(instruments=[Spy()]))
    assert seen == [("before", "a"), ("after", "a", True)]
    assert [r.name for r in program.log] == ["a"] and program.log[0].seconds >= 0
