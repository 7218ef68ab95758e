"""The only code that reads or writes checkpoint files: DCP training checkpoints with atomic commit
and resume (dcp.py, files.py), DeepSpeed checkpoints and resharding (deepspeed.py), model-only
checkpoints and single-process loading (model_io.py), Hugging Face import and export through each
family's adapter (hf.py). Sits below keel.train and above keel.model."""
