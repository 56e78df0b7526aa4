// Validates rendered Kubernetes manifests against their API's schema: each manifest's model class from
// kubernetes-models (the built-in API) or @kubernetes-models/keda (keda.sh), and its validate().
// Stdin: a JSON list of manifests. Stdout: JSON {validated: ["Kind/name"], skipped: [...], errors: [{resource,
// message}]} (skipped: an API group with no model package here, e.g. monitoring.coreos.com). Exit 1 on an error.
// Run by tests/chart/test_autoscaling_schema.py.
import { readFileSync } from "node:fs";

function modulePath(apiVersion, kind) {
  const [group, version] = apiVersion.includes("/") ? apiVersion.split("/") : ["", apiVersion];
  if (group === "keda.sh") return `@kubernetes-models/keda/keda.sh/${version}/${kind}`;
  if (group === "" || !group.includes(".") || group.endsWith(".k8s.io")) {
    return `kubernetes-models/${group ? `${group}/` : ""}${version}/${kind}`;
  }
  return null;
}

async function modelOf(apiVersion, kind) {
  const path = modulePath(apiVersion, kind);
  if (path === null) return null;
  const module = await import(path);
  if (!module[kind]) throw new Error(`${path} exports no ${kind}`);
  return module[kind];
}

const manifests = JSON.parse(readFileSync(0, "utf8"));
const report = { validated: [], skipped: [], errors: [] };
for (const manifest of manifests) {
  const resource = `${manifest.kind}/${manifest.metadata?.name}`;
  try {
    const Model = await modelOf(manifest.apiVersion, manifest.kind);
    if (Model === null) {
      report.skipped.push(resource);
      continue;
    }
    new Model(manifest).validate();
    report.validated.push(resource);
  } catch (error) {
    report.errors.push({ resource, message: String(error.message ?? error) });
  }
}
console.log(JSON.stringify(report));
process.exitCode = report.errors.length ? 1 : 0;
