"""Stage 3, training: the config and its one precedence rule (config), token blocks (data), teacher-sampled text
(synthetic), the fused KD loss (kd_loss), the loop (loop), checkpoints (checkpoint), torchrun + FSDP2 (dist)."""
