"""Planning: schedule the graph, estimate each step's cost, and print what a run would do."""

from .plan import Plan, Step, make_plan

__all__ = ["Plan", "Step", "make_plan"]
