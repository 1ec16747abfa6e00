#!/bin/bash
# Runs inside the lab guest (started by guest-init.sh, cwd = repo): the kernel tests.
# The repository is read-only here: no cache provider, no bytecode writes;
# the junit report goes to the results folder. Test paths given as arguments
# replace the default tests/kernel. The hypothesis plugin is off: importing it costs ~8 s
# under TCG (a test that imports hypothesis itself still works).
set -u
paths=(tests/kernel)
for a in "$@"; do
    [[ $a != -* && -e ${a%%::*} ]] && paths=()
done
exec python -m pytest "${paths[@]}" -p no:cacheprovider -p no:hypothesispytest -ra \
    --junitxml="$FIESNAP_LAB_RESULTS/junit.xml" -o junit_family=xunit2 "$@"
