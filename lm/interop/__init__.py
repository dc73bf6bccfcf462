"""Other libraries' calls on lm's models: transformers' text-generation pipeline."""
