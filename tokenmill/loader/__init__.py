"""Loading weights, configs and tokenizers from GGUF files and Hugging Face directories."""
