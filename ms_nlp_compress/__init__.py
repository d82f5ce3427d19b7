"""ms_nlp_compress: compress and accelerate pre-trained language models on MindSpore."""
__version__ = "0.1.0"
