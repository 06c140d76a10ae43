// Package validate checks the deployment files offline with the parsers the real tools use:
// docker-compose.yml through compose-go's loader (the library of `docker compose`), every
// Dockerfile through BuildKit's own parser, and every Kubernetes manifest under infra/k8s by
// strict decoding into the Kubernetes API's Go types (client-go's scheme); the KubeRay RayCluster
// under infra/k8s/ray against the RayCluster CRD's own OpenAPI schema (vendored in testdata/, with
// undeclared fields rejected). No engine, cluster or schema download is needed: `go test ./...` in
// this folder.
package validate
