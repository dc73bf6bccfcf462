"""lm's offline lm-evaluation-harness tasks (YAML + JSONL), built from the validation plays by build.py."""
