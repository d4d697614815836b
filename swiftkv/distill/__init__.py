"""Knowledge-preserving distillation: data (chat template, assistant masks, packing) and trainer."""
