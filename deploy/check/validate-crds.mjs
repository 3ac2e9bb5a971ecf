// Validates the prometheus-operator objects (PodMonitor, ServiceMonitor, PrometheusRule)
// in the given YAML files against the schemas of @kubernetes-models/prometheus-operator.
//
// kubernetes-validate knows only built-in kinds, so deploy/check.sh hands the
// monitoring.coreos.com documents to this script. The package's validators check types,
// enums, patterns and required fields but accept unknown fields, which is how a typo
// (`podMetricEndpoints`) slips through; so this script also runs each validator over a
// Proxy that records which keys the schema looked at, and reports every key it never read
// (objects the validator enumerated, such as label maps, are free-form and exempt).
//
// Usage: node validate-crds.mjs FILE...   Exits 1 on any error, 2 if no object was found.
import fs from "node:fs";
import yaml from "js-yaml";
import { PodMonitor } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/PodMonitor";
import { ServiceMonitor } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/ServiceMonitor";
import { PrometheusRule } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/PrometheusRule";

const MODELS = { PodMonitor, ServiceMonitor, PrometheusRule };
const GROUP = "monitoring.coreos.com/";

// Wraps `root` so every property read (get/has) and every key enumeration is recorded.
function track(root) {
  const seen = new Map();
  const proxies = new WeakMap();
  const wrap = (value) => {
    if (value === null || typeof value !== "object") return value;
    if (proxies.has(value)) return proxies.get(value);
    const info = { read: new Set(), enumerated: false };
    seen.set(value, info);
    const proxy = new Proxy(value, {
      get(target, key, receiver) {
        if (typeof key === "string") info.read.add(key);
        return wrap(Reflect.get(target, key, receiver));
      },
      has(target, key) {
        if (typeof key === "string") info.read.add(key);
        return Reflect.has(target, key);
      },
      ownKeys(target) {
        info.enumerated = true;
        return Reflect.ownKeys(target);
      },
    });
    proxies.set(value, proxy);
    return proxy;
  };
  return { proxy: wrap(root), seen };
}

function unknownFields(value, seen, path) {
  const out = [];
  if (Array.isArray(value)) {
    value.forEach((item, i) => out.push(...unknownFields(item, seen, `${path}[${i}]`)));
  } else if (value !== null && typeof value === "object") {
    const info = seen.get(value);
    for (const key of Object.keys(value)) {
      const child = path ? `${path}.${key}` : key;
      if (!info || (!info.enumerated && !info.read.has(key))) out.push(child);
      else out.push(...unknownFields(value[key], seen, child));
    }
  }
  return out;
}

const files = process.argv.slice(2);
if (files.length === 0) {
  console.error("usage: node validate-crds.mjs FILE...");
  process.exit(2);
}

let checked = 0;
let ok = 0;
let failed = 0;
for (const file of files) {
  let docs;
  try {
    docs = yaml.loadAll(fs.readFileSync(file, "utf8"));
  } catch (err) {
    console.error(`ERROR ${file}: not valid YAML: ${err.message}`);
    failed++;
    continue;
  }
  for (const doc of docs) {
    if (!doc || typeof doc !== "object" || !String(doc.apiVersion ?? "").startsWith(GROUP)) continue;
    const where = `${file} ${doc.kind}/${doc.metadata?.name ?? "?"}`;
    const Model = MODELS[doc.kind];
    if (!Model || doc.apiVersion !== Model.apiVersion) {
      console.error(`ERROR ${where}: no schema here for ${doc.apiVersion} ${doc.kind}`);
      failed++;
      continue;
    }
    checked++;
    // A JSON round trip gives plain objects (js-yaml may produce Dates for timestamps).
    const data = JSON.parse(JSON.stringify(doc));
    const { proxy, seen } = track(data);
    try {
      Model.prototype.validate.call(proxy);
    } catch (err) {
      console.error(`ERROR ${where}: ${err.message}`);
      failed++;
      continue;
    }
    const unknown = unknownFields(data, seen, "");
    if (unknown.length > 0) {
      console.error(`ERROR ${where}: unknown field(s): ${unknown.join(", ")}`);
      failed++;
      continue;
    }
    ok++;
    console.log(`ok    ${where}`);
  }
}

if (failed > 0) {
  console.error(`${failed} prometheus-operator object(s) failed, ${ok} ok`);
  process.exit(1);
}
if (checked === 0) {
  console.error("no prometheus-operator object found in the given files");
  process.exit(2);
}
console.log(`${ok} prometheus-operator object(s) valid`);
