"""Masked-LM general distillation on real text (SST-2 sentences, a MiniLM-L6 teacher)."""
