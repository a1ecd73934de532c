"""planc's built-in passes, one module each, in pipeline order."""
from planc.passes.dedupe import DedupePass
from planc.passes.fingerprint import FingerprintPass
from planc.passes.partition import HFBlockPolicy, PartitionPass
from planc.passes.trace import TracePass

__all__ = ["TracePass", "PartitionPass", "HFBlockPolicy", "FingerprintPass", "DedupePass", "CostPass",
           "ParallelizePass", "default_pipeline", "plan_pipeline"]


def default_pipeline() -> list:
    """The passes `planc compile` runs, in order: trace -> partition -> fingerprint -> dedupe."""
    return [TracePass(), PartitionPass(), FingerprintPass(), DedupePass()]


def plan_pipeline() -> list:
    """The passes `planc plan` runs without weights: cost -> parallelize."""
    from planc.passes.cost import CostPass
    from planc.passes.parallelize import ParallelizePass

    return [CostPass(), ParallelizePass()]


def __getattr__(name: str):
    # The planner's passes pull in OR-Tools; a server or a plain compile never needs it.
    if name == "CostPass":
        from planc.passes.cost import CostPass

        return CostPass
    if name == "ParallelizePass":
        from planc.passes.parallelize import ParallelizePass

        return ParallelizePass
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
