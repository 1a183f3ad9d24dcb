"""Tokenize texts with llama.cpp (llama-cpp-python), for tests/test_tokenizer_spm.py.

Run as a child process: llama_cpp must not share a process with torch. Reads
{"model": path, "texts": [...]} as JSON on stdin, prints a JSON list of id lists:
`Llama.tokenize(text.encode(), add_bos=False, special=False)` for each text.
"""

import json
import sys

import llama_cpp

request = json.load(sys.stdin)
llm = llama_cpp.Llama(model_path=request["model"], vocab_only=True, verbose=False)
ids = [llm.tokenize(t.encode("utf-8"), add_bos=False, special=False) for t in request["texts"]]
json.dump(ids, sys.stdout)
