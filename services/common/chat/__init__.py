"""How a model's dialogue is written into its prompt, and the model card that names the format."""
