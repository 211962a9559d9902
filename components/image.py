"""The container image every deeplight component runs in (docker/README.md builds it).

Components are lightweight Python components (`@dsl.component(base_image=IMAGE, install_kfp_package=False)`):
KFP embeds the function's source in the pipeline spec and runs it with the image's Python, which already has
deeplight and kfp installed, so nothing is pip-installed at run time (containers have no network). The same
component runs under `kfp.local.SubprocessRunner` (the local venv; the image is not used), under
`kfp.local.DockerRunner` and on a cluster. For a cluster, push the image to a registry and compile with
`deeplight pipeline compile --image REGISTRY/deeplight:TAG` (it rewrites the image of every step).
"""

# An explicit tag: KFP's DockerRunner adds :latest to untagged names and then tries to pull them.
IMAGE = "deeplight:local"
