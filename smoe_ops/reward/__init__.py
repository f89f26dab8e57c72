"""The sparse MoE reward model: learn several preference experts from binary pairs.

See DESIGN.md section 3. This package builds on the smoe_ops ops, never the reverse.
"""

from smoe_ops.reward import synthetic
from smoe_ops.reward.data import PreferenceData

__all__ = ["PreferenceData", "synthetic"]
