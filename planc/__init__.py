"""planc: compile one base model and its fine-tunes into a deduplicated block-chain serving bundle.

>>> import planc
>>> program = planc.load("examples/tiny/model.yaml")       # doctest: +SKIP
>>> program = planc.compile(program)                       # doctest: +SKIP
>>> planc.emit(program, backend="local", out="bundle/")    # doctest: +SKIP
"""
__version__ = "0.1.0"

from planc.api import compile, emit, load, load_pass  # noqa: E402
from planc.bundle import Bundle  # noqa: E402
from planc.errors import BundleError, CheckpointError, PassError, PlancError, SpecError  # noqa: E402
from planc.pass_manager import FunctionPass, Pass, PassContext, PassManager, function_pass  # noqa: E402
from planc.passes import default_pipeline  # noqa: E402
from planc.program import Program  # noqa: E402

__all__ = ["load", "compile", "emit", "load_pass", "default_pipeline", "Bundle", "Program", "Pass",
           "FunctionPass", "function_pass", "PassContext", "PassManager", "PlancError", "SpecError",
           "CheckpointError", "BundleError", "PassError", "__version__"]
