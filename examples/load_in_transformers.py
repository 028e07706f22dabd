"""Load an exported checkpoint with transformers alone (offline, no remote code) and generate.

    python examples/load_in_transformers.py runs/example_roundtrip/exported [--prompt TEXT]

Prints the config's media token ids as the tokenizer sees them, the chat prompt the tokenizer's
template renders, and a few greedy tokens for a text prompt.
"""

from __future__ import annotations

import argparse

import torch
from transformers import AutoConfig, AutoModelForImageTextToText, AutoTokenizer


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("path")
    p.add_argument("--prompt", default="A red square")
    p.add_argument("--new-tokens", type=int, default=8)
    args = p.parse_args(argv)
    tok = AutoTokenizer.from_pretrained(args.path, local_files_only=True)
    config = AutoConfig.from_pretrained(args.path, local_files_only=True)
    model = AutoModelForImageTextToText.from_pretrained(args.path, local_files_only=True,
                                                        dtype=torch.float32).eval()
    image = tok.convert_ids_to_tokens(config.image_token_id)
    print(f"image_token_id {config.image_token_id} = {image!r} in the tokenizer; "
          f"video_token_id {config.video_token_id}")
    if tok.chat_template:
        chat = tok.apply_chat_template([{"role": "user", "content": args.prompt}],
                                       tokenize=False, add_generation_prompt=True)
        print(f"chat prompt: {chat!r}")
    ids = tok(args.prompt, return_tensors="pt", add_special_tokens=False).input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=args.new_tokens, do_sample=False)
    print(f"greedy: {tok.decode(out[0, ids.shape[1]:])!r}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
