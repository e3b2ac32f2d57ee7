"""The benchmark behind ``multihead bench``."""

from .measure import Timing, peak_memory, time_call
from .runner import BenchSettings, run_bench

__all__ = ["Timing", "time_call", "peak_memory", "BenchSettings", "run_bench"]
