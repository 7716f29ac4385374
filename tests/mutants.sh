#!/usr/bin/env bash
# Break the code on purpose, one mutation at a time, and count the tests that catch it: the tolerances
# must stay tight enough that a probability moved by 1e-3, a float64 norm moved by 1e-9 relative, or an
# ablated head that leaks 1e-3 of its output fails. Run by hand after changing a tolerance:
#     bash tests/mutants.sh
# Each mutant runs in a throwaway worktree of HEAD (this checkout is never touched); every line printed
# must say "failed".
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
py="$repo/.venv/bin/python"
work="$(mktemp -d)"
trap 'git -C "$repo" worktree remove --force "$work/tree" >/dev/null 2>&1 || true; rm -rf "$work"' EXIT
git -C "$repo" worktree add -q --detach "$work/tree" HEAD
cd "$work/tree"

mutant() {  # name, file, "old|||new", test files...
  local name=$1 file=$2 edit=$3
  shift 3
  git checkout -q -- .
  "$py" - "$file" "$edit" <<'PY'
import sys
path, edit = sys.argv[1], sys.argv[2]
old, new = edit.split("|||")
text = open(path).read()
assert old in text, f"{path}: the code to mutate is gone: {old!r}"
open(path, "w").write(text.replace(old, new, 1))
PY
  echo "$name: $(PYTHONPATH="$PWD" "$py" -m pytest -q -p no:cacheprovider "$@" 2>&1 | tail -1)"
}

mutant "p_yes_norm + 1e-3 in the engine" verif/model/engine.py \
  's.p_yes_norm, s.log_odds, self.forward|||s.p_yes_norm + 1e-3, s.log_odds, self.forward' \
  tests/test_engine.py tests/test_score.py
mutant "weight-diff norm_base x (1 + 1e-9)" verif/analysis/weightdiff.py \
  'na, nb = np.sqrt(aa), np.sqrt(aa + ds)|||na, nb = np.sqrt(aa) * (1 + 1e-9), np.sqrt(aa + ds)' \
  tests/test_weightdiff.py tests/test_family_weightdiff.py
mutant "an ablated head keeps 1e-3 of its o_proj input" verif/model/ablation.py \
  'mask.to(attn_out.dtype)[:, None, :, None]|||(mask + (1 - mask) * 1e-3).to(attn_out.dtype)[:, None, :, None]' \
  tests/test_ablate.py tests/test_engine.py
