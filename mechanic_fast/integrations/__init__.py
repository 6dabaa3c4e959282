"""Callbacks that put Mechanic's scale and effective lr into the logs of training frameworks:
`mechanic_fast.integrations.transformers` (Hugging Face Trainer) and
`mechanic_fast.integrations.lightning` (PyTorch Lightning). Each imports its framework."""
