"""Host-side scheduling: which requests prefill, decode, or are preempted in each engine step."""
from jslora.scheduler.policies import FCFS, make_policy
from jslora.scheduler.scheduler import Scheduler, StepPlan

__all__ = ["Scheduler", "StepPlan", "FCFS", "make_policy"]
