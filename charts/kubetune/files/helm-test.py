"""`helm test` check: the FineTuneJob CRD is Established and every operator pod answers /healthz.

Runs in the operator image with the standard library only, as a service account that may read the one CRD
and list pods in the release namespace.
"""

import json
import os
import ssl
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
CRD = "finetunejobs.kubetune.io"


def api_get(path):
    host = os.environ["KUBERNETES_SERVICE_HOST"]
    if ":" in host:
        host = f"[{host}]"
    url = f"https://{host}:{os.environ['KUBERNETES_SERVICE_PORT']}{path}"
    with open(f"{SA_DIR}/token") as f:
        token = f.read().strip()
    context = ssl.create_default_context(cafile=f"{SA_DIR}/ca.crt")
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, context=context, timeout=10) as response:
        return json.load(response)


def crd_problem():
    crd = api_get(f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{CRD}")
    for condition in crd.get("status", {}).get("conditions", []):
        if condition.get("type") == "Established" and condition.get("status") == "True":
            return None
    return f"CRD {CRD} is not Established yet"


def operator_problem(namespace, selector, port):
    query = urllib.parse.urlencode({"labelSelector": selector})
    pods = api_get(f"/api/v1/namespaces/{namespace}/pods?{query}")["items"]
    running = [p for p in pods if p.get("status", {}).get("phase") == "Running" and p["status"].get("podIP")]
    if not running:
        return f"no running operator pod in namespace {namespace} matches {selector}"
    for pod in running:
        ip = pod["status"]["podIP"]
        host = f"[{ip}]" if ":" in ip else ip
        try:
            with urllib.request.urlopen(f"http://{host}:{port}/healthz", timeout=5) as response:
                if response.status != 200:
                    return f"operator pod {pod['metadata']['name']} /healthz answered {response.status}"
        except (urllib.error.URLError, OSError) as error:
            return f"operator pod {pod['metadata']['name']} /healthz at {host}:{port}: {error}"
        print(f"ok: operator pod {pod['metadata']['name']} ({ip}) is healthy", flush=True)
    return None


def main():
    namespace = os.environ["CHECK_NAMESPACE"]
    selector = os.environ["CHECK_SELECTOR"]
    port = int(os.environ["CHECK_HEALTH_PORT"])
    deadline = time.monotonic() + int(os.environ.get("CHECK_TIMEOUT_SECONDS", "60"))
    while True:
        try:
            problem = crd_problem() or operator_problem(namespace, selector, port)
        except (urllib.error.URLError, OSError, KeyError, ValueError) as error:
            problem = f"API request failed: {error}"
        if problem is None:
            print(f"ok: CRD {CRD} is Established", flush=True)
            return 0
        if time.monotonic() > deadline:
            print(f"FAIL: {problem}", file=sys.stderr, flush=True)
            return 1
        print(f"waiting: {problem}", flush=True)
        time.sleep(2)


sys.exit(main())
