"""Write the synthetic text corpus (train.txt / valid.txt, one document per line).

Regenerates the bundled copy by default::

    python tools/make_corpus.py            # -> megatron_vlm/data/assets/text/
    python tools/make_corpus.py --out-dir /tmp/corpus --num-train 20000
"""

from __future__ import annotations

import argparse

from megatron_vlm.data.corpus import bundled_corpus_dir, write_corpus


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", default=str(bundled_corpus_dir()))
    parser.add_argument("--num-train", type=int, default=8000)
    parser.add_argument("--num-valid", type=int, default=400)
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args(argv)
    out = write_corpus(args.out_dir, args.num_train, args.num_valid, args.seed)
    for name in ("train.txt", "valid.txt"):
        path = out / name
        print(f"{path}: {path.stat().st_size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
