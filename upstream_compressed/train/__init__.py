"""Training by distillation from a teacher (recovery after compression, DistilHuBERT students)."""
