"""Dataset fingerprint and the plan derived from it (spacing, patch, batch, network size, normalisation)."""

from medseg.plan.fingerprint import Fingerprint, compute_fingerprint
from medseg.plan.planner import Plan, apply_plan, make_plan

__all__ = ["Fingerprint", "Plan", "apply_plan", "compute_fingerprint", "make_plan"]
