"""Fine-tuning tasks (registry kind ``finetune_task``): data, labels and evaluation per objective."""
