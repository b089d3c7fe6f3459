"""Reading and writing checkpoints and tokenizers in the Hugging Face `nemotron_h` layout."""
