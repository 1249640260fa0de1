"""dsutil: SRe2L / LPLD dataset distillation with soft labels, from squeeze to student."""

__version__ = "0.1.0"
