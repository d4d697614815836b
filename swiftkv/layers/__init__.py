"""Building blocks of the model: norm, rotary embedding, attention over flat token batches."""
