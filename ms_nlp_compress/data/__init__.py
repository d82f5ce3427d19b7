"""Tokenization (WordPiece, SentencePiece), GLUE/CLUE readers, MindRecord pipelines and the demo-asset fetch.

Modules are imported on use (`from ms_nlp_compress.data.glue import read_sst2`) so that light commands do not pay
for MindSpore or `tokenizers` imports. See README.md in this folder.
"""
