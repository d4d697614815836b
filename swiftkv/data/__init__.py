"""Conversation data shared by distillation and evaluation."""
