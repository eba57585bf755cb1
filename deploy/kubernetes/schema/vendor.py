#!/usr/bin/env python3
"""Writes podmonitor.json from the Prometheus Operator's PodMonitor CRD (Apache-2.0).

Usage: vendor.py monitoring.coreos.com_podmonitors.yaml > podmonitor.json
(the CRD is example/prometheus-operator-crd/ in the operator's repository).

Takes the v1 version's openAPIV3Schema and makes it strict the way `kubectl apply
--validate=strict` is: an object that lists its properties gets additionalProperties: false
(unless the CRD keeps unknown fields), so a misspelt key fails instead of being pruned.
"""
import json
import sys

import yaml


def strict(node):
    if isinstance(node, dict):
        if (
            node.get("type") == "object"
            and "properties" in node
            and "additionalProperties" not in node
            and not node.get("x-kubernetes-preserve-unknown-fields")
        ):
            node["additionalProperties"] = False
        for value in node.values():
            strict(value)
    elif isinstance(node, list):
        for value in node:
            strict(value)


def main():
    with open(sys.argv[1]) as f:
        crd = yaml.safe_load(f)
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    schema = version["schema"]["openAPIV3Schema"]
    strict(schema)
    # The CRD's schema leaves apiVersion and kind free; the API server fixes them.
    schema["properties"]["apiVersion"]["enum"] = ["monitoring.coreos.com/v1"]
    schema["properties"]["kind"]["enum"] = ["PodMonitor"]
    schema["required"] = sorted(set(schema.get("required", [])) | {"apiVersion", "kind", "metadata", "spec"})
    operator = crd["metadata"]["annotations"].get("operator.prometheus.io/version", "unknown")
    out = {
        "$schema": "http://json-schema.org/draft-07/schema#",
        "$comment": f"PodMonitor v1 from the Prometheus Operator {operator} CRD (Apache-2.0), made strict by vendor.py",
        **schema,
    }
    json.dump(out, sys.stdout, indent=1, sort_keys=True)
    sys.stdout.write("\n")


main()
