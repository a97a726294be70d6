"""Align: turn extracted teacher parameters into a student update (LoRA init, fine-tuning)."""
