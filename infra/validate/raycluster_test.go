package validate

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/santhosh-tekuri/jsonschema/v6"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	"sigs.k8s.io/yaml"
)

// crdPath is the RayCluster CRD as KubeRay ships it (see the file's header for its origin).
const crdPath = "testdata/ray.io_rayclusters.yaml"

// rayClusterSchema compiles the CRD's v1 openAPIV3Schema as a JSON Schema. The API server prunes
// (and `kubectl apply --validate=strict` rejects) fields a structural schema does not declare, so
// every object schema that lists properties, and does not preserve unknown fields, gets
// additionalProperties: false; `nullable` becomes a null type, as the API server reads it.
func rayClusterSchema(t *testing.T) *jsonschema.Schema {
	t.Helper()
	data, err := os.ReadFile(crdPath)
	if err != nil {
		t.Fatal(err)
	}
	var crd struct {
		Spec struct {
			Versions []struct {
				Name   string `json:"name"`
				Schema struct {
					OpenAPIV3Schema map[string]any `json:"openAPIV3Schema"`
				} `json:"schema"`
			} `json:"versions"`
		} `json:"spec"`
	}
	if err := yaml.Unmarshal(data, &crd); err != nil {
		t.Fatalf("%s: %v", crdPath, err)
	}
	var schema map[string]any
	for _, v := range crd.Spec.Versions {
		if v.Name == "v1" {
			schema = v.Schema.OpenAPIV3Schema
		}
	}
	if schema == nil {
		t.Fatalf("%s has no v1 schema", crdPath)
	}
	strict(schema)
	compiler := jsonschema.NewCompiler()
	if err := compiler.AddResource("raycluster.json", schema); err != nil {
		t.Fatal(err)
	}
	compiled, err := compiler.Compile("raycluster.json")
	if err != nil {
		t.Fatal(err)
	}
	return compiled
}

func strict(node any) {
	switch n := node.(type) {
	case map[string]any:
		_, hasProps := n["properties"]
		_, hasAdditional := n["additionalProperties"]
		preserve, _ := n["x-kubernetes-preserve-unknown-fields"].(bool)
		if hasProps && !hasAdditional && !preserve {
			n["additionalProperties"] = false
		}
		if nullable, _ := n["nullable"].(bool); nullable {
			if typ, ok := n["type"].(string); ok {
				n["type"] = []any{typ, "null"}
			}
		}
		for key, child := range n {
			// "properties" maps names to schemas; its own keys are not schema keywords.
			if key == "properties" {
				for _, prop := range child.(map[string]any) {
					strict(prop)
				}
				continue
			}
			strict(child)
		}
	case []any:
		for _, child := range n {
			strict(child)
		}
	}
}

// rayDocs returns every YAML document under infra/k8s/ray, by file.
func rayDocs(t *testing.T) map[string][][]byte {
	t.Helper()
	paths, _ := filepath.Glob(filepath.Join(repoRoot(t), "infra", "k8s", "ray", "*.yaml"))
	if len(paths) == 0 {
		t.Fatal("no manifests under infra/k8s/ray")
	}
	docs := map[string][][]byte{}
	for _, path := range paths {
		data, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		reader := utilyaml.NewYAMLReader(bufioReader(data))
		for {
			doc, err := reader.Read()
			if err == io.EOF {
				break
			}
			if err != nil {
				t.Fatalf("%s: %v", path, err)
			}
			if len(bytes.TrimSpace(doc)) > 0 {
				docs[filepath.Base(path)] = append(docs[filepath.Base(path)], doc)
			}
		}
	}
	return docs
}

func validateRayCluster(schema *jsonschema.Schema, doc []byte) (map[string]any, error) {
	asJSON, err := yaml.YAMLToJSON(doc)
	if err != nil {
		return nil, err
	}
	value, err := jsonschema.UnmarshalJSON(bytes.NewReader(asJSON))
	if err != nil {
		return nil, err
	}
	if err := schema.Validate(value); err != nil {
		return nil, err
	}
	var obj map[string]any
	err = json.Unmarshal(asJSON, &obj)
	return obj, err
}

func TestRayClusterMatchesTheCRDSchema(t *testing.T) {
	schema := rayClusterSchema(t)
	found := 0
	for file, docs := range rayDocs(t) {
		for _, doc := range docs {
			var head struct {
				APIVersion string `json:"apiVersion"`
				Kind       string `json:"kind"`
				Metadata   struct {
					Namespace string `json:"namespace"`
				} `json:"metadata"`
			}
			if err := yaml.Unmarshal(doc, &head); err != nil {
				t.Fatalf("%s: %v", file, err)
			}
			if head.Metadata.Namespace != "nanochat" {
				t.Errorf("%s: %s is not in the nanochat namespace", file, head.Kind)
			}
			if head.Kind != "RayCluster" {
				// Everything else is a core kind: strict decoding into the API's Go types.
				if _, _, err := strictDecoder.Decode(doc, nil, nil); err != nil {
					t.Errorf("%s: strict decoding failed: %v", file, err)
				}
				continue
			}
			if head.APIVersion != "ray.io/v1" {
				t.Errorf("%s: RayCluster is %s, the CRD serves ray.io/v1", file, head.APIVersion)
			}
			obj, err := validateRayCluster(schema, doc)
			if err != nil {
				t.Errorf("%s: RayCluster does not match the CRD schema: %v", file, err)
				continue
			}
			found++
			checkTrainingCluster(t, file, obj)
		}
	}
	if found != 1 {
		t.Errorf("want one RayCluster under infra/k8s/ray, found %d", found)
	}
}

// checkTrainingCluster checks what the trainer's Ray executor relies on.
func checkTrainingCluster(t *testing.T, file string, obj map[string]any) {
	spec := obj["spec"].(map[string]any)
	if v := spec["rayVersion"]; v != lockedRayVersion(t) {
		t.Errorf("%s: rayVersion %v is not the ray locked in uv.lock (%s)", file, v, lockedRayVersion(t))
	}
	head := spec["headGroupSpec"].(map[string]any)
	if head["rayStartParams"].(map[string]any)["num-cpus"] != "0" {
		t.Errorf("%s: the head must offer no CPUs (no stage may land on it)", file)
	}
	driver := false
	for _, c := range podContainers(head) {
		env, _ := c["env"].([]any)
		for _, e := range env {
			if v := e.(map[string]any); v["name"] == "TRAINER_EXECUTOR" && v["value"] == "ray" {
				driver = true
			}
		}
	}
	if !driver {
		t.Errorf("%s: no container of the head pod runs the trainer with TRAINER_EXECUTOR=ray", file)
	}
	for _, g := range spec["workerGroupSpecs"].([]any) {
		group := g.(map[string]any)
		for _, c := range podContainers(group) {
			limits, _ := c["resources"].(map[string]any)["limits"].(map[string]any)
			if limits["nvidia.com/gpu"] == nil {
				t.Errorf("%s: worker group %v asks for no GPU", file, group["groupName"])
			}
			mounts := fmt.Sprint(c["volumeMounts"])
			if !strings.Contains(mounts, "/runs") || !strings.Contains(mounts, "/data") {
				t.Errorf("%s: worker group %v does not mount /runs and /data (the job folders)", file, group["groupName"])
			}
		}
	}
}

func podContainers(group map[string]any) []map[string]any {
	spec := group["template"].(map[string]any)["spec"].(map[string]any)
	var out []map[string]any
	for _, c := range spec["containers"].([]any) {
		out = append(out, c.(map[string]any))
	}
	return out
}

// lockedRayVersion is the version of the ray package in uv.lock.
func lockedRayVersion(t *testing.T) string {
	data, err := os.ReadFile(filepath.Join(repoRoot(t), "uv.lock"))
	if err != nil {
		t.Fatal(err)
	}
	_, after, ok := strings.Cut(string(data), "[[package]]\nname = \"ray\"\nversion = \"")
	if !ok {
		t.Fatal("uv.lock locks no ray package")
	}
	version, _, _ := strings.Cut(after, "\"")
	return version
}

func TestRayClusterSchemaCatchesATypo(t *testing.T) {
	schema := rayClusterSchema(t)
	bad := map[string]string{
		"misspelt spec field": "workerGroupSpec: []\n  headGroupSpec: {template: {spec: {containers: []}}}",
		"misspelt container field": "headGroupSpec:\n    template:\n      spec:\n        containers:\n" +
			"          - {name: x, image: img, imagePullPolicie: Always}",
		"wrong type": "headGroupSpec: {template: {spec: {containers: []}}}\n  workerGroupSpecs:\n" +
			"    - {groupName: g, replicas: two, template: {spec: {containers: []}}}",
	}
	for name, spec := range bad {
		doc := "apiVersion: ray.io/v1\nkind: RayCluster\nmetadata: {name: x}\nspec:\n  " + spec + "\n"
		_, err := validateRayCluster(schema, []byte(doc))
		if err == nil {
			t.Errorf("%s: must be rejected:\n%s", name, doc)
			continue
		}
		t.Logf("%s: %v", name, err)
	}
}
