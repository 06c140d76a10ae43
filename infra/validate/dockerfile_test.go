package validate

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/moby/buildkit/frontend/dockerfile/instructions"
	"github.com/moby/buildkit/frontend/dockerfile/parser"
)

// parseDockerfile runs BuildKit's own parser and instruction builder over a Dockerfile.
func parseDockerfile(path string) ([]instructions.Stage, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	result, err := parser.Parse(f)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	stages, _, err := instructions.Parse(result.AST, nil)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return stages, nil
}

func dockerfileStages(path string) (map[string]bool, error) {
	stages, err := parseDockerfile(path)
	if err != nil {
		return nil, err
	}
	names := map[string]bool{}
	for _, s := range stages {
		names[s.Name] = true
	}
	return names, nil
}

func TestDockerfilesParseAndCopyRealFiles(t *testing.T) {
	root := repoRoot(t)
	paths, _ := filepath.Glob(filepath.Join(root, "infra", "docker", "Dockerfile*"))
	if len(paths) == 0 {
		t.Fatal("no Dockerfile under infra/docker")
	}
	for _, path := range paths {
		stages, err := parseDockerfile(path)
		if err != nil {
			t.Error(err)
			continue
		}
		known := map[string]bool{}
		for _, stage := range stages {
			for _, cmd := range stage.Commands {
				cp, ok := cmd.(*instructions.CopyCommand)
				if !ok || cp.From != "" {
					if ok && !known[cp.From] && !strings.Contains(cp.From, "$") && !strings.Contains(cp.From, "/") {
						t.Errorf("%s: COPY --from=%s names no earlier stage", path, cp.From)
					}
					continue
				}
				for _, src := range cp.SourcePaths {
					// The build context is the repository root (docker-compose.yml's `context: .`).
					if _, err := os.Stat(filepath.Join(root, src)); err != nil {
						t.Errorf("%s: COPY source %s does not exist in the build context", path, src)
					}
				}
			}
			known[stage.Name] = true
		}
	}
}

func TestEveryImageCommandIsAnEntrypointService(t *testing.T) {
	root := repoRoot(t)
	script, err := os.ReadFile(filepath.Join(root, "infra", "docker", "entrypoint.sh"))
	if err != nil {
		t.Fatal(err)
	}
	stages, err := parseDockerfile(filepath.Join(root, "infra", "docker", "Dockerfile"))
	if err != nil {
		t.Fatal(err)
	}
	for _, stage := range stages {
		for _, cmd := range stage.Commands {
			c, ok := cmd.(*instructions.CmdCommand)
			if !ok || len(c.CmdLine) == 0 {
				continue
			}
			if !strings.Contains(string(script), "\n  "+c.CmdLine[0]+")") {
				t.Errorf("stage %s runs %q, which entrypoint.sh does not handle", stage.Name, c.CmdLine[0])
			}
		}
	}
}
