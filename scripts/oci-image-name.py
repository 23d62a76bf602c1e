"""Names the manifests of an OCI image layout for containerd, which names an
image it imports (`ctr images import`) after the io.containerd.image.name
annotation; the OCI ref.name stays the bare tag. Used by scripts/image.sh and
scripts/node-build.sh.

    python3 scripts/oci-image-name.py LAYOUT/index.json NAME
"""
import json
import sys

path, name = sys.argv[1], sys.argv[2]
with open(path) as f:
    index = json.load(f)
for manifest in index["manifests"]:
    manifest.setdefault("annotations", {})["io.containerd.image.name"] = name
with open(path, "w") as f:
    json.dump(index, f, separators=(",", ":"))
