# Shared helpers for the launch scripts (sourced, not run).
# DRY_RUN=1 prints each command instead of running it; `need VAR...` fails fast on missing settings.

DRY_RUN=${DRY_RUN:-0}

run() {
  if [ "$DRY_RUN" = 1 ]; then
    printf '+'; printf ' %q' "$@"; printf '\n'
  else
    "$@"
  fi
}

need() {
  local v missing=0
  for v in "$@"; do
    if [ -z "${!v:-}" ]; then echo "error: $v must be set" >&2; missing=1; fi
  done
  [ "$missing" = 0 ] || exit 2
}

parse_dry_run() {
  for a in "$@"; do [ "$a" = "--dry-run" ] && DRY_RUN=1; done
  return 0
}

strip_dry_run() {
  local a out=()
  for a in "$@"; do [ "$a" = "--dry-run" ] || out+=("$a"); done
  printf '%s\0' "${out[@]+"${out[@]}"}"
}
