"""The BinaryBERT / TernaryBERT recipe on quantized models: ternary weight splitting (``tws``), adaptive splitting
under a size budget (``adaptive``), half-width students (``width``) and distillation losses (``distill``)."""
