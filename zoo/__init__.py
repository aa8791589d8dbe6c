"""The tiny model zoo, a fixture builder (not part of the installed package): a base, a J-language expert and a
math expert whose per-layer merge beats all three, trained on CPU, plus their evaluation tasks (`ja_sub` is the
target). `data/zoo/` holds the committed seed-0 build; run `python -m zoo build --out data/zoo --seed 0` from the
repository root to rebuild it.
"""
