"""planc's built-in passes, one module each, in pipeline order."""
from planc.passes.cost import CostPass
from planc.passes.dedupe import DedupePass
from planc.passes.fingerprint import FingerprintPass
from planc.passes.partition import HFBlockPolicy, PartitionPass
from planc.passes.parallelize import ParallelizePass
from planc.passes.trace import TracePass

__all__ = ["TracePass", "PartitionPass", "HFBlockPolicy", "FingerprintPass", "DedupePass", "CostPass",
           "ParallelizePass", "default_pipeline", "plan_pipeline"]


def default_pipeline() -> list:
    """The passes `planc compile` runs, in order: trace -> partition -> fingerprint -> dedupe."""
    return [TracePass(), PartitionPass(), FingerprintPass(), DedupePass()]


def plan_pipeline() -> list:
    """The passes `planc plan` runs without weights: cost -> parallelize."""
    return [CostPass(), ParallelizePass()]
