#!/usr/bin/env bash
# Fetches ONNX Runtime's C/C++ API headers for building runtime_ext.
#
# The PyPI onnxruntime wheel ships no headers. This script downloads the Debian package
# libonnxruntime-dev of the trixie suite (ORT 1.21 headers; a library built against them
# loads in newer ORT releases, whose C API is versioned and backward compatible) and
# unpacks it into a cache folder. Nothing is installed and no system state is touched:
# apt-get runs with its own sources list, lists, cache and configuration under the cache
# folder; the package index is verified against the system Debian archive keyring.
#
# Usage: tools/fetch_ort_headers.sh [CACHE_DIR]      (default: .cache/ort-headers)
# Prints the include directory on success. Idempotent: a second run returns at once.
# Environment: ORT_HEADERS_MIRROR (archive URI; default: the machine's configured Debian
# archive, else http://deb.debian.org/debian), ORT_HEADERS_SUITE (default: trixie),
# ORT_HEADERS_KEYRING (default: /usr/share/keyrings/debian-archive-keyring.gpg).
set -euo pipefail

die() { echo "fetch_ort_headers: error: $*" >&2; exit 1; }
note() { echo "fetch_ort_headers: $*" >&2; }

cache=${1:-.cache/ort-headers}
suite=${ORT_HEADERS_SUITE:-trixie}
keyring=${ORT_HEADERS_KEYRING:-/usr/share/keyrings/debian-archive-keyring.gpg}
package=libonnxruntime-dev
mkdir -p "$cache" || die "cannot create cache folder $cache"
cache=$(cd "$cache" && pwd)
root="$cache/root"
include="$root/usr/include/onnxruntime"
stamp="$cache/.complete"

if [[ -f "$stamp" && -f "$include/onnxruntime_c_api.h" && -f "$include/onnxruntime_cxx_api.h" ]]; then
  echo "$include"
  exit 0
fi

for tool in apt-get dpkg-deb; do
  command -v "$tool" >/dev/null || die "$tool not found: this script needs a Debian-based system (apt-get, dpkg-deb)"
done
[[ -r "$keyring" ]] || die "archive keyring $keyring not readable (install debian-archive-keyring or set ORT_HEADERS_KEYRING)"

# The archive URI: the machine's own Debian archive (deb822 .sources or one-line lists).
mirror=${ORT_HEADERS_MIRROR:-}
if [[ -z "$mirror" ]]; then
  mirror=$(cat /etc/apt/sources.list.d/*.sources 2>/dev/null \
    | sed -n 's#^URIs:[[:space:]]*\(.*://[^[:space:]]*/debian\)/\{0,1\}[[:space:]]*$#\1#p' | head -n1 || true)
fi
if [[ -z "$mirror" ]]; then
  mirror=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null \
    | sed -n 's#^deb[[:space:]]\+\(\[[^]]*\][[:space:]]\+\)\{0,1\}\([a-z]*://[^[:space:]]*/debian\)/\{0,1\}[[:space:]].*#\2#p' | head -n1 || true)
fi
mirror=${mirror:-http://deb.debian.org/debian}

apt_dir="$cache/apt"
mkdir -p "$apt_dir/lists/partial" "$apt_dir/cache/archives/partial" "$apt_dir/parts" \
  "$apt_dir/preferences.d" "$apt_dir/download"
cat >"$apt_dir/sources.list" <<SRC
deb [signed-by=$keyring] $mirror $suite main
SRC
# A private configuration: no system apt.conf.d parts (no hooks, no extra index targets),
# only the proxy settings carried over so that the download goes the same way apt's does.
proxy_lines=$(apt-config dump 2>/dev/null | grep -E '^Acquire::(http|https)::Proxy ' || true)
cat >"$apt_dir/apt.conf" <<CONF
Dir::Etc::Parts "$apt_dir/parts";
Dir::Etc::Main "/dev/null";
Dir::Etc::SourceList "$apt_dir/sources.list";
Dir::Etc::SourceParts "$apt_dir/parts";
Dir::Etc::Preferences "/dev/null";
Dir::Etc::PreferencesParts "$apt_dir/preferences.d";
Dir::State "$apt_dir";
Dir::State::Lists "$apt_dir/lists";
Dir::State::status "/dev/null";
Dir::Cache "$apt_dir/cache";
Dir::Cache::pkgcache "$apt_dir/cache/pkgcache.bin";
Dir::Cache::srcpkgcache "$apt_dir/cache/srcpkgcache.bin";
Dir::Log "$apt_dir";
APT::Architecture "amd64";
APT::Architectures { "amd64"; };
Acquire::Languages "none";
Acquire::Retries "3";
Acquire::Check-Valid-Until "false";
$proxy_lines
CONF
# apt downloads as the unprivileged _apt user when run as root: let it write our folders.
if [[ $(id -u) -eq 0 ]] && id _apt >/dev/null 2>&1; then
  chown -R _apt "$apt_dir/lists" "$apt_dir/download" 2>/dev/null || true
fi
export APT_CONFIG="$apt_dir/apt.conf"

note "updating the $suite package index from $mirror"
log="$cache/apt.log"
if ! apt-get -q update >"$log" 2>&1; then
  tail -n 5 "$log" >&2
  die "apt-get update of $mirror $suite failed (network, mirror or signature problem; full log: $log)"
fi
if grep -qE '^(W|E):' "$log"; then
  grep -E '^(W|E):' "$log" >&2
  die "apt-get update of $mirror $suite reported problems (full log: $log)"
fi

note "downloading $package"
rm -f "$apt_dir/download/"*.deb
if ! (cd "$apt_dir/download" && apt-get -q download "$package") >>"$log" 2>&1; then
  tail -n 5 "$log" >&2
  die "apt-get download $package from $suite failed (full log: $log)"
fi
deb=$(ls "$apt_dir/download/"*.deb 2>/dev/null | head -n1 || true)
[[ -n "$deb" ]] || die "apt-get download left no .deb in $apt_dir/download"

rm -rf "$root"
mkdir -p "$root"
dpkg-deb -x "$deb" "$root" || die "cannot unpack $deb"
[[ -f "$include/onnxruntime_c_api.h" && -f "$include/onnxruntime_cxx_api.h" ]] \
  || die "$deb has no onnxruntime_c_api.h / onnxruntime_cxx_api.h under usr/include/onnxruntime"
basename "$deb" >"$stamp"
# The package index is only needed for the download: drop it (about 140 MB).
rm -rf "$apt_dir/lists" "$apt_dir/cache"
note "headers from $(basename "$deb") in $include"
echo "$include"
