"""A small renderer of deploy/k8s/kustomization.yaml, so the manifests can be checked without kubectl or a cluster:
it concatenates the `resources` (files, or directories with their own kustomization.yaml) and applies the three
transformers the kustomization uses: `namespace`, `labels` (metadata only, as kustomize does without
includeSelectors) and `images`. Any other key is refused rather than ignored, so the tests never check something
other than what `kubectl apply -k` would apply. tests/test_k8s.py compares it with `kubectl kustomize` when present.
"""

from __future__ import annotations

import copy
from pathlib import Path

import yaml

SUPPORTED = {"apiVersion", "kind", "namespace", "labels", "resources", "images"}
# Kinds without a namespace (the ones a kustomization like this one could hold).
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition", "PersistentVolume",
                  "StorageClass", "PriorityClass", "ClusterTriggerAuthentication"}


def load_documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def pod_spec(doc: dict) -> dict | None:
    spec = doc.get("spec") or {}
    if doc["kind"] == "Pod":
        return spec
    if doc["kind"] == "CronJob":
        return spec.get("jobTemplate", {}).get("spec", {}).get("template", {}).get("spec")
    return (spec.get("template") or {}).get("spec")


def containers(doc: dict) -> list[dict]:
    spec = pod_spec(doc) or {}
    return [*spec.get("initContainers", []), *spec.get("containers", [])]


def _set_image(container: dict, images: list[dict]) -> None:
    image = container.get("image", "")
    name = image.split("@")[0]
    if ":" in name.rsplit("/", 1)[-1]:
        name = name.rsplit(":", 1)[0]
    for rule in images:
        if rule["name"] == name:
            new = rule.get("newName", name)
            if "digest" in rule:
                container["image"] = f"{new}@{rule['digest']}"
            else:
                tag = rule.get("newTag") or (image[len(name) + 1:] if image != name else "")
                container["image"] = f"{new}:{tag}" if tag else new


def render(directory: Path) -> list[dict]:
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(kustomization) - SUPPORTED
    if unknown:
        raise ValueError(f"{directory}/kustomization.yaml: this renderer does not apply {sorted(unknown)}")
    docs: list[dict] = []
    for resource in kustomization.get("resources", []):
        path = directory / resource
        docs += render(path) if path.is_dir() else copy.deepcopy(load_documents(path))
    namespace = kustomization.get("namespace")
    for doc in docs:
        metadata = doc.setdefault("metadata", {})
        if namespace and doc["kind"] not in CLUSTER_SCOPED:
            metadata["namespace"] = namespace
        if namespace and doc["kind"] == "Namespace":
            metadata["name"] = namespace
        for entry in kustomization.get("labels", []):
            if entry.get("includeSelectors") or entry.get("includeTemplates"):
                raise ValueError("labels with includeSelectors/includeTemplates are not rendered here")
            metadata.setdefault("labels", {}).update(entry.get("pairs", {}))
        for container in containers(doc):
            _set_image(container, kustomization.get("images", []))
    return docs
