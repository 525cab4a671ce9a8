"""One package or module per tokenizer family: its config, its model and the reader of its official files."""
