"""Stage 2, the student: the teacher's copy with fake-quant modules (and optional LoRA) following a type plan."""
from .fakequant import (FakeQuantEmbedding, FakeQuantLinear, FakeQuantTiedHead, convert, learned_block_scales,
                        prepare, set_fake_quant, snap_toward_grid_)
from .lora import add_lora
from .plan import apply_plan_, plan_types

__all__ = ["FakeQuantEmbedding", "FakeQuantLinear", "FakeQuantTiedHead", "add_lora", "apply_plan_", "convert",
           "learned_block_scales", "plan_types", "prepare", "set_fake_quant", "snap_toward_grid_"]
