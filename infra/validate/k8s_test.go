package validate

import (
	"bufio"
	"bytes"
	"io"
	"os"
	"path/filepath"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/serializer"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	"k8s.io/client-go/kubernetes/scheme"
)

// strictDecoder rejects unknown and duplicate fields, as `kubectl apply --validate=strict` does.
var strictDecoder = serializer.NewCodecFactory(scheme.Scheme, serializer.EnableStrict).UniversalDeserializer()

func k8sObjects(t *testing.T) map[string][]runtime.Object {
	t.Helper()
	paths, _ := filepath.Glob(filepath.Join(repoRoot(t), "infra", "k8s", "*.yaml"))
	if len(paths) == 0 {
		t.Fatal("no manifests under infra/k8s")
	}
	objects := map[string][]runtime.Object{}
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
			if len(bytes.TrimSpace(doc)) == 0 {
				continue
			}
			obj, gvk, err := strictDecoder.Decode(doc, nil, nil)
			if err != nil {
				t.Errorf("%s: strict decoding failed: %v", filepath.Base(path), err)
				continue
			}
			if gvk.Kind != "Namespace" {
				if meta, ok := obj.(interface{ GetNamespace() string }); ok && meta.GetNamespace() != "nanochat" {
					t.Errorf("%s: %s is not in the nanochat namespace", filepath.Base(path), gvk.Kind)
				}
			}
			objects[gvk.Kind] = append(objects[gvk.Kind], obj)
		}
	}
	return objects
}

func TestManifestsDecodeStrictly(t *testing.T) {
	objects := k8sObjects(t)
	deployments := map[string]*appsv1.Deployment{}
	for _, obj := range objects["Deployment"] {
		d := obj.(*appsv1.Deployment)
		deployments[d.Name] = d
	}
	for _, name := range []string{"registry", "trainer-api", "trainer-worker", "inference", "webui"} {
		d, ok := deployments[name]
		if !ok {
			t.Errorf("no Deployment %s", name)
			continue
		}
		selector := d.Spec.Selector.MatchLabels
		for k, v := range selector {
			if d.Spec.Template.Labels[k] != v {
				t.Errorf("%s: selector %s=%s does not match the pod labels", name, k, v)
			}
		}
		c := d.Spec.Template.Spec.Containers[0]
		if c.Resources.Requests.Memory().IsZero() {
			t.Errorf("%s: no memory request", name)
		}
		if len(c.Ports) > 0 && (c.ReadinessProbe == nil || c.LivenessProbe == nil) {
			t.Errorf("%s serves HTTP but has no readiness/liveness probe", name)
		}
	}
	for _, name := range []string{"trainer-worker", "inference"} {
		if d, ok := deployments[name]; ok {
			gpu := d.Spec.Template.Spec.Containers[0].Resources.Limits[corev1.ResourceName("nvidia.com/gpu")]
			if gpu.IsZero() {
				t.Errorf("%s asks for no GPU", name)
			}
		}
	}
	if d, ok := deployments["inference"]; ok && (d.Spec.Replicas == nil || *d.Spec.Replicas < 2) {
		t.Error("inference should run several replicas behind its Service")
	}
	services := map[string]bool{}
	for _, obj := range objects["Service"] {
		services[obj.(*corev1.Service).Name] = true
	}
	for _, name := range []string{"registry", "trainer-api", "inference", "webui"} {
		if !services[name] {
			t.Errorf("no Service for %s", name)
		}
	}
}

func TestStrictDecodingCatchesATypo(t *testing.T) {
	doc := []byte("apiVersion: v1\nkind: Service\nmetadata: {name: x}\nspec: {selectr: {app: x}}\n")
	if _, _, err := strictDecoder.Decode(doc, nil, nil); err == nil {
		t.Fatal("a misspelt field must be rejected")
	}
}

func bufioReader(data []byte) *bufio.Reader { return bufio.NewReader(bytes.NewReader(data)) }
