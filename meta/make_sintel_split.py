"""Write Sintel_train_val.txt, the fixed 908/133 train/val split of the MPI Sintel training flow fields.

Rule: validation = every flow field of ambush_6 and market_6 plus the last 25 of bamboo_2, cave_4 and temple_2;
everything else trains. One line per flow field, in sorted sequence order, "1" (train) or "2" (val).

Usage: python -m meta.make_sintel_split [output]
"""
from __future__ import annotations

import hashlib
import sys
from pathlib import Path

# training sequences in sorted order and their number of flow fields (frames - 1)
SEQUENCES = (('alley_1', 49), ('alley_2', 49), ('ambush_2', 20), ('ambush_4', 32), ('ambush_5', 49),
             ('ambush_6', 19), ('ambush_7', 49), ('bamboo_1', 49), ('bamboo_2', 49), ('bandage_1', 49),
             ('bandage_2', 49), ('cave_2', 49), ('cave_4', 49), ('market_2', 49), ('market_5', 49),
             ('market_6', 39), ('mountain_1', 49), ('shaman_2', 49), ('shaman_3', 49), ('sleeping_1', 49),
             ('sleeping_2', 49), ('temple_2', 49), ('temple_3', 49))
VAL_ALL = ('ambush_6', 'market_6')
VAL_LAST_25 = ('bamboo_2', 'cave_4', 'temple_2')
EXPECTED_MD5 = 'd0896f0d8fd3f6a1fedfb25497acf3fa'


def split_codes() -> list[int]:
    """1 (train) or 2 (val) for each of the 1041 training flow fields, in sorted order."""
    codes = []
    for name, count in SEQUENCES:
        n_val = count if name in VAL_ALL else 25 if name in VAL_LAST_25 else 0
        codes += [1] * (count - n_val) + [2] * n_val
    return codes


def split_text() -> str:
    return ''.join(f'{code}\n' for code in split_codes())


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    output = Path(argv[0]) if argv else Path(__file__).with_name('Sintel_train_val.txt')
    text = split_text()
    md5 = hashlib.md5(text.encode()).hexdigest()
    if md5 != EXPECTED_MD5:
        raise SystemExit(f'generated split has md5 {md5}, expected {EXPECTED_MD5}: the rule or counts are wrong')
    output.write_text(text)
    print(f'wrote {output}: {text.count("1")} train, {text.count("2")} val, md5 {md5}')


if __name__ == '__main__':
    main()
