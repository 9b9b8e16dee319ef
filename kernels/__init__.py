"""MoE expert kernels (see DESIGN.md, "The fused MoE kernel"). The engine currently runs mlx-lm's
own ``SwitchGLU`` (``mx.gather_qmm``) path; the fused, expert-grouped kernel lands here."""
