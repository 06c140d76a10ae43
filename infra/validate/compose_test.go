package validate

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/compose-spec/compose-go/v2/loader"
	"github.com/compose-spec/compose-go/v2/types"
)

// repoRoot is two folders up from infra/validate.
func repoRoot(t *testing.T) string {
	t.Helper()
	root, err := filepath.Abs(filepath.Join("..", ".."))
	if err != nil {
		t.Fatal(err)
	}
	return root
}

// exampleEnv is .env.example with every empty required value filled in, as a user would.
func exampleEnv(t *testing.T, root string) map[string]string {
	t.Helper()
	data, err := os.ReadFile(filepath.Join(root, ".env.example"))
	if err != nil {
		t.Fatalf(".env.example: %v", err)
	}
	env := map[string]string{}
	for _, line := range strings.Split(string(data), "\n") {
		line = strings.TrimSpace(line)
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		key, value, _ := strings.Cut(line, "=")
		if value == "" {
			value = "test-" + strings.ToLower(key)
		}
		env[key] = value
	}
	return env
}

func loadCompose(t *testing.T, env map[string]string, files ...string) (*types.Project, error) {
	t.Helper()
	root := repoRoot(t)
	var configFiles []types.ConfigFile
	for _, f := range files {
		configFiles = append(configFiles, types.ConfigFile{Filename: filepath.Join(root, f)})
	}
	details := types.ConfigDetails{WorkingDir: root, ConfigFiles: configFiles, Environment: env}
	return loader.LoadWithContext(context.Background(), details, func(o *loader.Options) {
		o.SetProjectName("nanochat", true)
	})
}

func TestComposeLoadsAndIsComplete(t *testing.T) {
	root := repoRoot(t)
	project, err := loadCompose(t, exampleEnv(t, root), "docker-compose.yml")
	if err != nil {
		t.Fatalf("compose-go rejects docker-compose.yml: %v", err)
	}
	want := []string{"postgres", "redis", "minio", "minio-init", "registry", "trainer-api",
		"trainer-worker", "inference", "webui"}
	for _, name := range want {
		if _, err := project.GetService(name); err != nil {
			t.Errorf("service %s missing: %v", name, err)
		}
	}
	for name, svc := range project.Services {
		if name == "minio-init" {
			continue // a one-shot job: others wait for it to complete, not to be healthy
		}
		if svc.HealthCheck == nil || len(svc.HealthCheck.Test) == 0 {
			t.Errorf("service %s has no healthcheck", name)
		}
		if svc.Image == "" {
			t.Errorf("service %s has no image name", name)
		}
		if svc.Build == nil {
			_, tag, _ := strings.Cut(svc.Image, ":")
			if tag == "" || tag == "latest" {
				t.Errorf("service %s uses an unpinned image %q", name, svc.Image)
			}
		}
		for dep, cond := range svc.DependsOn {
			ok := cond.Condition == types.ServiceConditionHealthy ||
				(dep == "minio-init" && cond.Condition == types.ServiceConditionCompletedSuccessfully)
			if !ok {
				t.Errorf("%s depends on %s with condition %q, not a health gate", name, dep, cond.Condition)
			}
		}
	}
	for _, name := range []string{"trainer-worker", "inference"} {
		svc, _ := project.GetService(name)
		if !hasGPUReservation(svc) {
			t.Errorf("%s reserves no GPU", name)
		}
	}
	worker, _ := project.GetService("trainer-worker")
	if worker.ShmSize == 0 || worker.Ipc != "host" {
		t.Errorf("trainer-worker needs shm_size and ipc for torchrun, got shm %d ipc %q", worker.ShmSize, worker.Ipc)
	}
	for _, v := range []string{"postgres-data", "minio-data", "data-cache", "model-cache"} {
		if _, ok := project.Volumes[v]; !ok {
			t.Errorf("named volume %s missing", v)
		}
	}
}

func hasGPUReservation(svc types.ServiceConfig) bool {
	if svc.Deploy == nil || svc.Deploy.Resources.Reservations == nil {
		return false
	}
	for _, d := range svc.Deploy.Resources.Reservations.Devices {
		for _, c := range d.Capabilities {
			if c == "gpu" {
				return true
			}
		}
	}
	return false
}

func TestComposeBuildsPointAtRealFiles(t *testing.T) {
	root := repoRoot(t)
	project, err := loadCompose(t, exampleEnv(t, root), "docker-compose.yml")
	if err != nil {
		t.Fatal(err)
	}
	for name, svc := range project.Services {
		if svc.Build == nil {
			continue
		}
		dockerfile := svc.Build.Dockerfile
		if !filepath.IsAbs(dockerfile) {
			dockerfile = filepath.Join(svc.Build.Context, dockerfile)
		}
		stages, err := dockerfileStages(dockerfile)
		if err != nil {
			t.Errorf("%s: %v", name, err)
			continue
		}
		if svc.Build.Target != "" && !stages[svc.Build.Target] {
			t.Errorf("%s builds target %q, which %s does not define", name, svc.Build.Target, dockerfile)
		}
	}
	for name, svc := range project.Services {
		for _, v := range svc.Volumes {
			if v.Type == types.VolumeTypeBind {
				if _, err := os.Stat(v.Source); err != nil {
					t.Errorf("%s mounts %s, which does not exist", name, v.Source)
				}
			}
		}
	}
}

func TestComposeRefusesMissingSecrets(t *testing.T) {
	root := repoRoot(t)
	for _, secret := range []string{"REGISTRY_TOKEN", "REGISTRY_READ_TOKEN"} {
		env := exampleEnv(t, root)
		delete(env, secret)
		_, err := loadCompose(t, env, "docker-compose.yml")
		if err == nil || !strings.Contains(err.Error(), secret) {
			t.Errorf("loading without %s should fail naming it, got %v", secret, err)
		}
	}
}

// envOf is a service's environment value, "" when unset.
func envOf(svc types.ServiceConfig, key string) string {
	if v := svc.Environment[key]; v != nil {
		return *v
	}
	return ""
}

// The registry requires a token for reads; what only reads gets the read token, never the write
// token, and the worker, which uploads, the write token.
func TestComposeHandsTheRegistryReadTokenToItsReaders(t *testing.T) {
	root := repoRoot(t)
	env := exampleEnv(t, root)
	project, err := loadCompose(t, env, "docker-compose.yml")
	if err != nil {
		t.Fatalf("compose-go rejects docker-compose.yml: %v", err)
	}
	read, write := env["REGISTRY_READ_TOKEN"], env["REGISTRY_TOKEN"]
	registry, _ := project.GetService("registry")
	if envOf(registry, "REGISTRY_READ_TOKEN") != read || envOf(registry, "REGISTRY_READ_TOKEN_REQUIRED") != "true" {
		t.Errorf("the registry does not require its read token: %v", registry.Environment)
	}
	readers := map[string]string{
		"inference":   "INFERENCE_REGISTRY_TOKEN",
		"webui":       "WEBUI_REGISTRY_READ_TOKEN",
		"trainer-api": "TRAINER_REGISTRY_TOKEN",
	}
	for name, key := range readers {
		svc, _ := project.GetService(name)
		if envOf(svc, key) != read {
			t.Errorf("%s: %s is %q, not the read token", name, key, envOf(svc, key))
		}
	}
	for _, name := range []string{"inference", "trainer-api"} {
		svc, _ := project.GetService(name)
		for key, v := range svc.Environment {
			if v != nil && *v == write {
				t.Errorf("%s holds the registry's write token in %s", name, key)
			}
		}
	}
	worker, _ := project.GetService("trainer-worker")
	if envOf(worker, "TRAINER_REGISTRY_TOKEN") != write {
		t.Errorf("the worker uploads with %q, not the write token", envOf(worker, "TRAINER_REGISTRY_TOKEN"))
	}
}

// bubblewrap needs namespaces and a fresh /proc inside the worker's container (the compose file
// says why); the worker stays unprivileged.
func TestComposeLetsTheWorkerRunBubblewrap(t *testing.T) {
	root := repoRoot(t)
	project, err := loadCompose(t, exampleEnv(t, root), "docker-compose.yml")
	if err != nil {
		t.Fatalf("compose-go rejects docker-compose.yml: %v", err)
	}
	worker, _ := project.GetService("trainer-worker")
	opts := map[string]bool{}
	for _, o := range worker.SecurityOpt {
		opts[o] = true
	}
	for _, want := range []string{"seccomp=unconfined", "apparmor=unconfined", "systempaths=unconfined"} {
		if !opts[want] {
			t.Errorf("trainer-worker lacks security_opt %s (got %v)", want, worker.SecurityOpt)
		}
	}
	if worker.Privileged || len(worker.CapAdd) > 0 {
		t.Errorf("trainer-worker must stay unprivileged, got privileged=%v cap_add=%v", worker.Privileged, worker.CapAdd)
	}
	for name, svc := range project.Services {
		if name != "trainer-worker" && len(svc.SecurityOpt) > 0 {
			t.Errorf("%s relaxes its confinement too: %v", name, svc.SecurityOpt)
		}
	}
}

func TestCPUOverrideDropsGPUs(t *testing.T) {
	root := repoRoot(t)
	project, err := loadCompose(t, exampleEnv(t, root), "docker-compose.yml", "infra/compose.cpu.yml")
	if err != nil {
		t.Fatalf("compose-go rejects the CPU override: %v", err)
	}
	for _, name := range []string{"trainer-worker", "inference"} {
		svc, _ := project.GetService(name)
		if hasGPUReservation(svc) {
			t.Errorf("%s still reserves a GPU in the CPU variant", name)
		}
	}
}

func TestDockerExecutorOverrideWiresTheEngine(t *testing.T) {
	root := repoRoot(t)
	project, err := loadCompose(t, exampleEnv(t, root), "docker-compose.yml", "infra/compose.docker-executor.yml")
	if err != nil {
		t.Fatalf("compose-go rejects the docker executor override: %v", err)
	}
	worker, err := project.GetService("trainer-worker")
	if err != nil {
		t.Fatal(err)
	}
	env := func(key string) string {
		if v := worker.Environment[key]; v != nil {
			return *v
		}
		return ""
	}
	if env("TRAINER_EXECUTOR") != "docker" {
		t.Errorf("TRAINER_EXECUTOR is %q", env("TRAINER_EXECUTOR"))
	}
	socket := false
	for _, v := range worker.Volumes {
		if v.Source == "/var/run/docker.sock" && v.Target == "/var/run/docker.sock" {
			socket = true
		}
	}
	if !socket {
		t.Error("the worker does not mount the engine's socket")
	}
	// The stage containers get the same volumes as the worker: the names must be the real ones.
	for key, volume := range map[string]string{"TRAINER_DOCKER_DATA_VOLUME": "data-cache", "TRAINER_DOCKER_RUNS_VOLUME": "runs"} {
		if got, want := env(key), project.Volumes[volume].Name; got != want || want == "" {
			t.Errorf("%s is %q, the %s volume is named %q", key, got, volume, want)
		}
	}
	if env("TRAINER_DOCKER_IMAGE") != worker.Image {
		t.Errorf("stage image %q differs from the worker's %q", env("TRAINER_DOCKER_IMAGE"), worker.Image)
	}
}
