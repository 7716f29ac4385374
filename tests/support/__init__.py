"""Test and benchmark support: seed-shaped random models and the offline Qwen2.5 tokenizer."""
