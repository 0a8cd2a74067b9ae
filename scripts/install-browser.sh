#!/bin/sh
# Headless Chromium and its WebDriver for the web UI's browser test (tests/unit/ui/test_browser.py), from Debian's
# packages, installed when missing where we may: as root with apt-get (as test-postgres.sh does), or on CI
# (CI=true) through sudo. Elsewhere this only says how, and the test skips with that reason.
if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "browser test: no Chromium and no apt-get here; it will be skipped" >&2
    exit 0
fi
if [ "$(id -u)" = "0" ]; then
    SUDO=""
elif [ "${CI:-}" = "true" ]; then
    SUDO="sudo"
else
    echo "browser test: Chromium not found, it will be skipped (install: apt-get install chromium chromium-driver)" >&2
    exit 0
fi
echo "browser test: installing chromium and chromium-driver (apt)" >&2
{ $SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q chromium chromium-driver; } \
    >/dev/null 2>&1 || echo "browser test: apt-get install chromium chromium-driver failed; it will be skipped" >&2
exit 0
