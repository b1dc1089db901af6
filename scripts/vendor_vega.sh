#!/usr/bin/env bash
# Rebuild dvc_plots/template.html: the `dvc plots show` page with vega, vega-lite and vega-embed inlined.
#
# Why: dvc-render's default page loads these three from cdn.jsdelivr.net, so offline the plots render
# blank (docs/mlops-stack.md "DVC"). The template has `{plot_divs}` and no `{scripts}`, so DVC never inserts the
# CDN tags. Enable it with (the path is relative to .dvc/):
#   dvc config plots.html_template ../dvc_plots/template.html
# Versions are the ones dvc-render's CDN tags pin; the sha256 of each file is checked, so a rebuild is
# byte-identical. Needs npm and the npm registry (run it once, commit the result).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PKGS=(vega@5.20.2 vega-lite@5.2.0 vega-embed@6.18.2)
FILES=(vega.min.js vega-lite.min.js vega-embed.min.js)
SHA256=(
  4794d0169cb1f3ebad8117fe98ba5bd652dd725905ec0384e832391dbccb03be
  d73157451b3978015ab31dacd55ff90d986ab8663fc0abed50f97b3cd90002cb
  1ba9826431ddc9805e815ad92acc811c819f2bfd32bda2a128b8c4b5070fab5e
)
OUT=dvc_plots/template.html

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
(cd "$tmp" && npm pack --silent "${PKGS[@]}" >/dev/null)

for i in "${!PKGS[@]}"; do
  name=${PKGS[$i]%@*} version=${PKGS[$i]#*@}
  mkdir -p "$tmp/$name"
  tar -xzf "$tmp/$name-$version.tgz" -C "$tmp/$name" package/LICENSE "package/build/${FILES[$i]}"
  f="$tmp/$name/package/build/${FILES[$i]}"
  echo "${SHA256[$i]}  $f" | sha256sum --check --quiet
  # an inline script must not contain "</script" or DVC's placeholders (DVC would substitute inside it)
  if grep -qiE '</script|\{(plot_divs|scripts|refresh_tag)\}' "$f"; then
    echo "vendor_vega.sh: $f contains </script or a DVC placeholder; cannot inline it" >&2
    exit 1
  fi
done

mkdir -p "$(dirname "$OUT")"
{
  cat <<'EOF'
<!DOCTYPE html>
<html>
<head>
<meta charset="utf-8">
{refresh_tag}
<title>DVC Plot</title>
<style>
  body { font-family: system-ui, sans-serif; }
  table { border-spacing: 15px; }
</style>
<!--
Built by scripts/vendor_vega.sh: vega 5.20.2, vega-lite 5.2.0 and vega-embed 6.18.2 inlined so that
`dvc plots show` renders without network access. Their licenses follow.
EOF
  for i in "${!PKGS[@]}"; do
    name=${PKGS[$i]%@*}
    printf '\n%s %s:\n' "$name" "${PKGS[$i]#*@}"
    sed 's/--/- -/g' "$tmp/$name/package/LICENSE"
  done
  printf -- '-->\n'
  for i in "${!PKGS[@]}"; do
    name=${PKGS[$i]%@*}
    printf '<script type="text/javascript">\n'
    cat "$tmp/$name/package/build/${FILES[$i]}"
    printf '\n</script>\n'
  done
  cat <<'EOF'
</head>
<body>
{plot_divs}
</body>
</html>
EOF
} >"$OUT"
echo "wrote $OUT ($(wc -c <"$OUT") bytes, sha256 $(sha256sum "$OUT" | cut -c1-16)...)"
