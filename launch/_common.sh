# Helpers shared by the launch scripts; source it, don't run it.

# run CMD ARGS...: print the command, shell-quoted so the printed line can be copied and run
# as it is (an argument with spaces stays one argument), then run it.
run() {
  printf '+'
  printf ' %q' "$@"
  printf '\n'
  "$@"
}
